from disploss.commands.main import console

console()
